// Character-Adapter: hover tooltips for the extension's own controls (ids charadapter_<tab>_<name>).
(function() {
    const tips = {
        accordion: "Keep a character's face and clothes from one reference picture (Character-Adapter)",
        image: "The character to keep: one picture; transparent areas count as grey",
        model: "IP-Adapter checkpoint (SD1.5 or SDXL, matching the loaded model)",
        encoder: "CLIP image encoder; Auto picks the one the adapter was trained with",
        refresh: "Look for new adapter and encoder files",
        weight: "Overall strength of the reference",
        start: "Fraction of the sampling steps after which the reference starts to act",
        end: "Fraction of the sampling steps after which the reference stops acting",
        reference_phrase: "Words that locate this region in the reference picture, e.g. face, red jacket; empty = unused slot",
        phrase: "Words of your prompt that locate this region in the new image; empty = same as the reference phrase",
        region_weight: "Strength of this region relative to the others",
        fusion: "soft: blend regions smoothly at their borders; hard: each position follows one region",
        crop: "strip: full-width bands of the reference; box: tight boxes around each region",
        temperature: "Softness of region borders in soft fusion; lower = sharper",
        background: "Region strength below which a position counts as background (no region)",
        timestep: "Noise level (of 1000) at which the reference is segmented into regions",
        show_masks: "Add the reference crops and region masks to the results",
    };

    function tipFor(id) {
        const m = /^charadapter_(?:txt2img|img2img)_(?:region\d+_)?(.+)$/.exec(id);
        if (!m) return null;
        const key = id.includes("_region") && m[1] === "weight" ? "region_weight" : m[1];
        return tips[key] || null;
    }

    onUiLoaded(function() {
        gradioApp().querySelectorAll('[id^="charadapter_"]').forEach(function(el) {
            const tip = tipFor(el.id);
            if (tip) el.title = tip;
        });
    });
})();
