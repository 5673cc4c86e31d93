"""``python -m launch.prefill``: an SGLang prefill server of a PD pair, with kvtier's transfer backend and cache.

Takes ``--kvtier-config PATH`` and ``--bootstrap-port N``; every other argument goes to SGLang
(``python -m launch.prefill --help``). The shared logic is in ``kvtier.launch.server``.
"""

from kvtier.launch.server import main

if __name__ == "__main__":
    main("prefill")
