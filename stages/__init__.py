"""The commands: DVC stage entry points and console scripts, thin CLIs over pipeline/ on the one shell (pipeline.cli)."""
