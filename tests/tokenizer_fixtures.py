"""
A small CLIP tokenizer directory for tests: vocab.json + merges.txt + tokenizer_config.json +
special_tokens_map.json, trained with model.tokenizer.train_bpe on a corpus of common Stable Diffusion
prompt words. Loads in model.tokenizer.CLIPTokenizer, transformers.CLIPTokenizer and diffusers pipelines
(as their "tokenizer" subfolder). With the default corpus the vocabulary has exactly `vocab_size` tokens
(default 1000: ids 0..999, bos "<|startoftext|>" = 998, eos/pad "<|endoftext|>" = 999), so a text model
with config.vocab_size >= 1000 can embed every id.
"""

from pathlib import Path

from model.tokenizer import CLIPTokenizer, train_bpe

DEFAULT_VOCAB_SIZE = 1000

PROMPTS = [
    "a photo of a cat sitting on a red chair",
    "a photograph of an astronaut riding a horse on the moon",
    "portrait of a beautiful woman, highly detailed, digital painting, artstation, concept art",
    "a painting of a fox in the snow, oil on canvas, by claude monet",
    "a castle on a hill at sunset, fantasy landscape, dramatic lighting, 4k, 8k, uhd",
    "an old man with a long white beard, close up portrait, studio lighting, sharp focus",
    "a cute dog playing in the park with a ball, golden hour, bokeh",
    "cyberpunk city street at night, neon lights, rain, reflections, cinematic",
    "a bowl of fruit on a wooden table, still life, realistic, trending on artstation",
    "a small house in the forest near a lake, mountains in the background, morning fog",
    "a man and a woman walking on the beach, blue sky, white clouds, ocean waves",
    "anime girl with blue hair and green eyes, smiling, school uniform, illustration",
    "a robot reading a book in a library, warm light, detailed, unreal engine, octane render",
    "a bird flying over the river, watercolor, soft colors, pastel",
    "a red sports car on a highway in the desert, motion blur, photorealistic",
    "a dragon breathing fire over a medieval village, epic, matte painting, by greg rutkowski",
    "the eiffel tower in paris during spring, flowers, people, street photography",
    "a black and white photo of a train station, vintage, film grain, 35mm",
    "a glass of water on a kitchen table, minimalist, simple, clean background",
    "a teddy bear wearing a hat and a scarf, toy, studio photo, soft shadows",
    "a giant tree with glowing leaves, magical forest, fireflies, night, moonlight",
    "a spaceship landing on an alien planet, science fiction, stars, galaxy, nebula",
    "a bowl of ramen with eggs and green onions, food photography, top view",
    "a knight in shiny armor holding a sword, full body, character design",
    "an elephant and a giraffe in the savanna, wildlife photography, national geographic",
    "a cozy living room with a fireplace, sofa, plants, interior design, warm colors",
    "a lighthouse on a rocky coast during a storm, dark clouds, lightning, waves crashing",
    "a little girl holding a yellow umbrella in the rain, children's book illustration",
    "a skull with roses, tattoo design, black ink, line art, high contrast",
    "a city skyline at dawn seen from above, aerial view, drone shot, skyscrapers",
    "a wizard casting a spell, purple smoke, glowing staff, dungeons and dragons",
    "a sleeping kitten in a basket, fluffy, adorable, macro shot, shallow depth of field",
    "a vase of sunflowers by vincent van gogh, impressionism, thick brush strokes",
    "a snowy mountain peak under a clear sky, hiking trail, pine trees, winter",
    "a mermaid swimming with fish under the sea, coral reef, sunlight rays, underwater",
    "a pixel art scene of a farm with cows, chickens and a barn, retro video game",
    "a samurai standing in a bamboo forest, japanese ink painting, ukiyo-e",
    "a steampunk airship above the clouds, brass, gears, victorian, intricate details",
    "a smiling chef cooking pasta in a restaurant kitchen, candid, natural light",
    "a 3d render of a low poly island with palm trees, isometric, colorful, blender",
    "a man wearing sunglasses and a leather jacket riding a motorcycle, 1980s poster",
    "an abstract painting with circles, squares and triangles, bauhaus, bold colors",
    "a ghost in an abandoned hospital, horror, creepy, dark, fog, eerie atmosphere",
    "a happy family having a picnic in a green meadow, summer, sunny day, smiling faces",
    "a wolf howling at the full moon, silhouette, mountains, starry night sky",
    "a queen with a golden crown and a red dress, renaissance painting, baroque, ornate",
    "a futuristic soldier with a helmet and a rifle, sci-fi armor, battlefield, smoke",
    "a hamburger with cheese, lettuce and tomato, fries, advertising photo, studio",
    "a frog wearing a tiny crown sitting on a lily pad, pond, whimsical, storybook",
    "a temple in the jungle covered with vines, ancient ruins, mysterious, volumetric light",
    "a young boy flying a kite on a windy hill, grass, clouds, ghibli style",
    "a ballerina dancing on a stage, spotlight, elegant, graceful, long exposure",
    "an owl perched on a branch at twilight, feathers, detailed eyes, nature photography",
    "a neon sign that says open in a dark alley, wet pavement, moody, noir",
    "a marble statue of a greek god in a museum, sculpture, classical, white stone",
    "a treehouse with a rope ladder, kids playing, autumn leaves, orange and brown",
    "a bicycle leaning against a brick wall, flowers in the basket, europe, old town",
    "masterpiece, best quality, ultra detailed, extremely detailed, high resolution, hdr",
    "worst quality, low quality, blurry, ugly, deformed, bad anatomy, extra fingers, watermark, text",
    "a portrait photo of a young man with curly hair and freckles, 50mm lens, f/1.8",
    "a cup of coffee with latte art on a saucer, morning, window light, cafe",
    "a lion with a big mane lying on a rock, africa, wildlife, telephoto",
    "a magical potion in a glass bottle, glowing liquid, fantasy item, game asset",
    "a quiet street in tokyo at night, lanterns, vending machines, rain puddles",
    "a horse running across a field of wildflowers, freedom, spring, wind",
    "a space station orbiting the earth, realistic, nasa photo, solar panels",
    "a modern house with large windows and a swimming pool, architecture photography",
    "a panda eating bamboo, cute, chubby, zoo, soft fur, high detail",
    "a witch flying on a broom over a pumpkin field, halloween, orange moon, bats",
    "a sailboat on a calm sea at sunrise, pink and orange sky, peaceful, serene",
    "an ice cream cone with three scoops, strawberry, chocolate and vanilla, summer",
    "a old wooden bridge over a waterfall, moss, rocks, lush green valley",
    "a cat wearing a space suit, floating in space, planets, stars, digital art",
    "a group of friends laughing around a campfire, night, guitar, tents, marshmallows",
    "the face of a cyborg woman, half human half machine, wires, chrome, blue glow",
    "a jellyfish glowing in the deep ocean, bioluminescent, dark blue water",
    "a map of a fantasy kingdom, parchment, hand drawn, rivers, mountains, cities",
    "a chess board with wooden pieces, dramatic shadows, close up, shallow focus",
    "a train crossing a stone bridge in the mountains, steam, autumn, scenic",
    "it's a dog's life, don't worry, they're happy, we've been here, i'm fine, you'll see, he'd go",
]


def make_tokenizer_dir(path, corpus=None, vocab_size: int = DEFAULT_VOCAB_SIZE, pad_token: str = "<|endoftext|>"):
    """Train a CLIP-style BPE on `corpus` (default: PROMPTS) and save it into `path` (created).
    Returns `path` as a Path. len(vocab) == vocab_size unless the corpus runs out of pairs."""
    vocab, merges = train_bpe(PROMPTS if corpus is None else list(corpus), vocab_size)
    path = Path(path)
    CLIPTokenizer(vocab, merges, pad_token=pad_token).save(path)
    return path
