"""Training stage: data modules, token extraction and Lightning modules (the only package importing Lightning)."""
