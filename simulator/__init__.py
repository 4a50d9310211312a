"""Synthetic traffic days on real maps with ground truth, GPS error model, ping file formats.

Pure Python/numpy: never imports Kafka, Faust or the web server.
"""
