"""`make bench`: a load generator for the chat path (websocket -> run -> worker -> fake LLM).

Start here: docs/benchmark.md. `python -m bench --help` lists the options.
"""
