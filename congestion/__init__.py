"""From traversals to segment speeds: windows, space-mean speed, free flow, jam levels, privacy gate.

Pure Python/numpy: never imports Kafka, Faust or the web server.
"""
