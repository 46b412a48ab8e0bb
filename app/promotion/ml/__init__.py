"""The ML steps of a promotion, each a command run in a subprocess (torch never loads into the gateway or
the worker): `python -m app.promotion.ml.merge`, `python -m app.promotion.ml.quantize` (in the quantizer's
own environment). They talk to their caller through app/promotion/ml/protocol.py (standard library only)."""
