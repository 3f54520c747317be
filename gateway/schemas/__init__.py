"""OpenAI wire types, named as OpenAI names them. Requests ignore fields we don't use."""
