"""``python -m standin_prefill``: the stand-in worker as a prefill server, for ``launch.cluster`` tests."""

from standin_worker import main

if __name__ == "__main__":
    main("prefill")
