"""Scripts behind `trl qrpo ...`: `qrpo.py` is the training script that `accelerate launch` runs."""
