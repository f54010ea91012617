"""The adapter file and everything that reads or writes it: diffusers layout + our metadata, kohya/LyCORIS,
the model card, atomic writes, checked loading into any diffusers pipeline. Never imports training or serving."""
