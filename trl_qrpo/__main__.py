"""`python -m trl_qrpo ...`: the same as `trl-qrpo ...` and `trl qrpo ...` (see trl_qrpo/cli.py)."""

from trl_qrpo.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m trl_qrpo"))
