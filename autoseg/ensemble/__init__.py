"""Choosing and refining the final pipeline on cross-validation: ensembling the probabilities of several
configurations, selecting the configuration or ensemble with the best CV score, and learning postprocessing
rules (connected-component removal, minimum component volume, consistency of nested regions) on the chosen
pipeline's CV predictions, each rule kept only where it raises the CV Dice (:mod:`autoseg.ensemble.postprocessing`).
"""
