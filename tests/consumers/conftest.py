def pytest_configure(config):
    config.addinivalue_line("markers", "llamacpp: needs llama_cpp and a llama.cpp tree (scripts/test-consumers.sh)")
