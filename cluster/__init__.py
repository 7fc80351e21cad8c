"""Several bridge nodes behind one address, coordinated through Redis (`REDIS_URL`).

See `node.py`. Without REDIS_URL nothing here runs: a node is the whole server.
"""
