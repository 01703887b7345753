"""The sections of bench.py, one file per comparison; each has measure(cfg, device) -> its figures
for out/bench.json. Run them through bench.py (python bench.py --only=NAME), which holds the
options and the helpers they share."""
