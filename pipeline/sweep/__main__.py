"""`python -m pipeline.sweep`: the sweep command of stages/sweep.py (also the DVC stage and `coop-sweep`)."""
from stages.sweep import main

raise SystemExit(main())
