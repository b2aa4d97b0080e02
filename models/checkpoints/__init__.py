"""Model directories on disk, converters from other formats, random-weight presets."""
