"""Layer 2, communication: what a message costs and how downloads travel. Byte
accounting, delta-coded downloads with their dense-refresh cap, and the wireless
network model that prices a round in seconds.

May import: ``core``, ``settings``.
"""
