"""Moving bytes between processes and hosts: the ``Transport`` interface and its backends.

``base`` defines the interface (registered regions, batched one-sided writes and reads,
notifications ordered after the writes before them, a deadline on every wait); ``zmq_transport``
is the ZMQ/TCP backend, which needs nothing beyond pyzmq; ``cuda_ipc`` moves GPU regions between
processes of one host by CUDA IPC (host regions over ZMQ); ``backends.open_transport`` picks one.
"""
