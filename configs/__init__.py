"""The shipped recipes (YAML). setup.py installs this folder as ``emma_mamba.configs``; the commands find them
through :func:`emma_mamba.config.shipped_config_dir` and accept them by name (``emma-mamba configs`` lists them)."""
