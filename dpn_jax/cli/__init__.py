"""The command-line tools: argument parsing and error reporting only (`common.run_command`).

`dpn-convert`, `dpn-predict`, `dpn-evaluate`, `dpn-export` and `dpn-prepare-data`; `train.py` at
the repository's top is the trainer's, installed as `dpn-train` (`cli.train` runs that file).
"""
