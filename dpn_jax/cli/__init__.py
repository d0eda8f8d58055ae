"""The command-line tools (`dpn-convert`, `dpn-predict`, `dpn-evaluate`): argument parsing and error reporting only."""
