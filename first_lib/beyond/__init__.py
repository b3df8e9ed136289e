"""Beyond the paper: how many teacher tokens a store keeps, and top-k against sampled tokens.

A package of its own so that none of the pipeline's code hashes (and so none of the default
run's artefact keys) change when it does: `sampled` (random-sampling KD: the estimator and its
loss), `stores` (writing stores of any rows in the top-k store format), `plan` (what the study
makes, named and keyed without computing: `first clean` reads it), `study` (the cached study
the chapter `beyond_k` reads).
"""
