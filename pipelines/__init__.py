"""Pipeline definitions: they only wire components and parameters."""
