"""The PostgreSQL wire-protocol server: codec (protocol.py), SCRAM (scram.py), sessions, the asyncio loop."""
