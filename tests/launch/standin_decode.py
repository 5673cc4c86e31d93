"""``python -m standin_decode``: the stand-in worker as a decode server, for ``launch.cluster`` tests."""

from standin_worker import main

if __name__ == "__main__":
    main("decode")
