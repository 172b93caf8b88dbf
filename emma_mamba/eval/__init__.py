"""Evaluation: scorers for POPE, VQAv2, GQA, TextVQA, VizWiz, MMBench, SEED-Bench, ScienceQA-IMG and MME that
read each benchmark's standard files, and the runner that answers them with a checkpoint (:mod:`.runner`,
``emma-mamba eval``).

``emma_mamba.eval.scorers.score(task, answers, annotations)`` is the single entry point; the per-benchmark
modules (``pope``, ``vqa``, ``gqa``, ``mmbench``, ``seed``, ``scienceqa``, ``mme``) hold the metric
definitions and answer normalisation.
"""
