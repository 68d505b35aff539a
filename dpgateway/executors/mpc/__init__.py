"""``mpc``: K parties compute the bounded aggregates on their own rows and release only a noisy total.

Protocol and proof note: dpgateway/executors/mpc/party.py; the threat model: docs/executors.md.
"""
