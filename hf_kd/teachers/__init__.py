"""Where the targets come from: loading and pairing teachers (pairs), their placement (placement), several teachers'
curriculum (curriculum), the top-k teacher cache (cache), the served teacher (served) and int8 teachers (quantize)."""
