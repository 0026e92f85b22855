"""The book's infrastructure: what every chapter uses and no chapter teaches.

runtime (seed, device, size, ``seeded``), hardware (what is present), data and text (offline
datasets), train (the one training engine), measure (parameters, FLOPs, the one timer), viz
(plots and ``show``), notebook (the setup cell and ``glue``). Nothing here imports a chapter module.
"""
