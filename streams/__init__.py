"""The edges of roadpulse: the Faust app, the embedded runner, the feed server, metrics and the CLI.

The only package that talks to the outside world (Kafka, HTTP, files given on the command line).
"""
