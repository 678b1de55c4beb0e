"""A stand-in for vLLM in tests/test_serve_secrets.py: importable, "CPU", and an OpenAI server that logs its
arguments and secret-looking environment variables as a careless server would."""
