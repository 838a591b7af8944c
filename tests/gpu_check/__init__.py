"""The prepared GPU check (README.md in this folder). Its device side needs only the standard
library and numpy: nothing here imports llamahost except prepare.py, which runs where the
toolkit is installed."""
