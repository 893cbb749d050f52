"""Stage configs: `configs/<stage>.py:get_config(preset)` -> ml_collections.ConfigDict; `common` holds
the pieces shared by every stage. Scripts put the repository root on sys.path so `configs` imports."""
