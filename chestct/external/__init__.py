"""External validation: score a labelled folder of scans with an exported model and write a report."""
