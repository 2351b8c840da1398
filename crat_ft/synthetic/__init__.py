"""The synthetic long-tailed LVIS-format benchmark the demo trains and evaluates on."""
