"""Export formats (registry), their parity check, metadata.json (schema) and the model card."""
