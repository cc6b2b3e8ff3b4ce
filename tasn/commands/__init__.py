"""The `tasn` subcommands, one module per area: data, train, evaluate, registry, predict, pipeline.

A handler parses its arguments into a call of one library function and prints the result; it
writes no file and changes no config (the library decides and writes). Each module imports its
stage's code inside the handler, when the command runs, so `tasn --help` stays fast and a command
needs only the dependencies of its own stage.
"""
