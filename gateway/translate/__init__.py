"""Pure functions between OpenAI wire types and the backend protobufs; nothing else imports both."""
