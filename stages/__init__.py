"""DVC stage entry points: thin CLIs over pipeline/ (prepare, features, sweep, baselines, report)."""
