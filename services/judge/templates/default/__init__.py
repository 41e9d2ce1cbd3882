"""The default judge template set (v1). Editing any file changes every response's ``template_hash``."""
