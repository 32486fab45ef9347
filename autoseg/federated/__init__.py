"""Federated planning, training and evaluation on Flower: sites keep their images; only aggregate statistics, the
plans, network weights, sample counts and Dice travel (:mod:`autoseg.federated.site`, :mod:`autoseg.federated.server`).
"""
