"""Images, folders of labelled images, and few-shot episodes."""
