"""Model presets: tiny (embedded), llada, dream."""
