"""SFT data: conversation formats and the tokenised dataset the trainer reads."""
