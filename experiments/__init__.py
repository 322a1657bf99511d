r"""Experiments beside the library: one folder each, never imported by it.

Each `experiments/<name>/` holds `config.py`, `run.py` and a README with the
question, the command and the results; run from the repository root:

  python -m experiments.<name>.run --config experiments/<name>/config.py \
      --workdir DIR
"""
