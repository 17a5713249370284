"""SFT data: record formats, chat-template rendering and loss masks, and the tokenized-data cache."""
