"""spec.json -> a validated Spec: the attribute table, image config checks, the JSON Schema."""
