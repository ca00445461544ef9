"""videor1 command-line interface (thin: parsing, config, registry records, console output)."""
