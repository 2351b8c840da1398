# The decoupled baseline: identical to crat_synthetic.py with CRAT off
# (class-balanced retraining of the same class-wise layers).
_base_ = ["./crat_synthetic.py"]

crat = dict(enable=False)
