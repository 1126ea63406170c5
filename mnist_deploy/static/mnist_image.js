// The drawing as the model's input, in the page: a port of mnist_deploy/data/images.py's mnist_image()
// and normalize_pixels(), step for step and in float32 where numpy computes in float32 (Math.fround),
// so the page runs the model on what the server would have made of the same canvas: grayscale, inverted
// when the border is light, background level subtracted and contrast stretched, cropped to the digit,
// its longer side scaled to 20 px with Pillow's Lanczos filter, pasted into 28x28 with its centre of
// mass at the centre, then (x / 255 - mean) / std. (Pillow's step for images over 1024 px is not here:
// the canvas is 280.) Exposed as window.MnistImage.
"use strict";

(() => {
  const f = Math.fround;
  const DIGIT_BOX = 20;
  const FIELD = 28;
  const CENTRE = 14.0;

  function roundHalfEven(x) { // Python's round()
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  function median(values) { // numpy's median of float32 values
    const s = Float32Array.from(values).sort();
    const n = s.length;
    return n % 2 ? s[(n - 1) / 2] : f(f(s[n / 2 - 1] + s[n / 2]) / 2);
  }

  function border(gray, w, h) {
    const out = [];
    for (let x = 0; x < w; x += 1) out.push(gray[x]);
    for (let x = 0; x < w; x += 1) out.push(gray[(h - 1) * w + x]);
    for (let y = 1; y < h - 1; y += 1) out.push(gray[y * w]);
    for (let y = 1; y < h - 1; y += 1) out.push(gray[y * w + w - 1]);
    return out;
  }

  const R = f(0.299);
  const G = f(0.587);
  const B = f(0.114);
  const luma = (r, g, b) => f(f(f(r * R) + f(g * G)) + f(b * B));
  const GRAY = Float32Array.from({ length: 256 }, (_, v) => luma(v, v, v)); // r = g = b: most of a drawing

  function grayscale(rgba, w, h) { // Pillow's RGBA -> luminance, transparent pixels as background
    const n = w * h;
    const lum = new Float32Array(n);
    let opaque = true;
    for (let i = 0, j = 0; i < n; i += 1, j += 4) {
      const r = rgba[j];
      const g = rgba[j + 1];
      const b = rgba[j + 2];
      lum[i] = r === g && g === b ? GRAY[r] : luma(r, g, b);
      if (rgba[j + 3] !== 255) opaque = false;
    }
    if (opaque) return lum; // lum * 1 + background * 0, exactly
    let weight = 0;
    let inked = 0;
    const alpha = new Float32Array(n);
    for (let i = 0; i < n; i += 1) {
      alpha[i] = f(rgba[4 * i + 3] / 255);
      weight += alpha[i];
      inked += lum[i] * alpha[i];
    }
    const background = weight > 0 && inked / weight > 127.5 ? 0 : 255;
    for (let i = 0; i < n; i += 1) lum[i] = f(f(lum[i] * alpha[i]) + f(background * f(1 - alpha[i])));
    return lum;
  }

  function lanczos(x) {
    const sinc = (v) => (v === 0 ? 1 : Math.sin(v * Math.PI) / (v * Math.PI));
    return x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0;
  }

  function coefficients(inSize, outSize) { // Pillow's precompute_coeffs (Resample.c)
    const scale = inSize / outSize;
    const filterscale = Math.max(scale, 1);
    const support = 3 * filterscale;
    const out = [];
    for (let xx = 0; xx < outSize; xx += 1) {
      const center = (xx + 0.5) * scale;
      const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
      const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
      const k = [];
      let ww = 0;
      for (let x = 0; x < xmax; x += 1) {
        const w = lanczos((x + xmin - center + 0.5) / filterscale);
        k.push(w);
        ww += w;
      }
      out.push({ xmin, k: ww !== 0 ? k.map((v) => v / ww) : k });
    }
    return out;
  }

  function resize(src, w, h, outW, outH) { // Image.resize((outW, outH), LANCZOS) on a mode "F" image
    let img = src;
    let width = w;
    if (outW !== w) {
      const cs = coefficients(w, outW);
      const tmp = new Float32Array(outW * h);
      for (let y = 0; y < h; y += 1) {
        for (let xx = 0; xx < outW; xx += 1) {
          let ss = 0;
          cs[xx].k.forEach((k, x) => { ss += img[y * width + cs[xx].xmin + x] * k; });
          tmp[y * outW + xx] = ss;
        }
      }
      img = tmp;
      width = outW;
    }
    if (outH !== h) {
      const cs = coefficients(h, outH);
      const tmp = new Float32Array(width * outH);
      for (let yy = 0; yy < outH; yy += 1) {
        for (let x = 0; x < width; x += 1) {
          let ss = 0;
          cs[yy].k.forEach((k, y) => { ss += img[(cs[yy].xmin + y) * width + x] * k; });
          tmp[yy * width + x] = ss;
        }
      }
      img = tmp;
    }
    return img;
  }

  // RGBA pixels (an ImageData's data) -> Float32Array(784) in 0..255, or null when the image is blank.
  function mnistImage(rgba, w, h) {
    let gray = grayscale(rgba, w, h);  // eslint-disable-line prefer-const
    if (median(border(gray, w, h)) > 127.5) gray = gray.map((v) => f(255 - v));
    const edge = border(gray, w, h);
    const level = median(edge);
    const noise = 1.4826 * median(edge.map((v) => Math.abs(f(v - level))));
    const cut = f(level + 5 * noise);
    let peak = 0;
    for (let i = 0; i < gray.length; i += 1) {
      const c = cut === 0 ? gray[i] : Math.max(f(gray[i] - cut), 0); // v - 0 clipped at 0 is v (v >= 0)
      gray[i] = c;
      if (c > peak) peak = c;
    }
    if (!(peak > 0)) return null;
    const gain = f(255 / peak);
    let top = h; let bottom = -1; let left = w; let right = -1;
    for (let y = 0; y < h; y += 1) {
      for (let x = 0; x < w; x += 1) {
        const v = f(gray[y * w + x] * gain);
        gray[y * w + x] = v;
        if (v !== 0) { top = Math.min(top, y); bottom = Math.max(bottom, y); left = Math.min(left, x); right = Math.max(right, x); }
      }
    }
    let dw = right - left + 1;
    let dh = bottom - top + 1;
    let digit = new Float32Array(dw * dh);
    for (let y = 0; y < dh; y += 1) digit.set(gray.subarray((top + y) * w + left, (top + y) * w + left + dw), y * dw);
    const scale = DIGIT_BOX / Math.max(dh, dw);
    const sw = Math.max(1, roundHalfEven(dw * scale));
    const sh = Math.max(1, roundHalfEven(dh * scale));
    if (sw !== dw || sh !== dh) {
      digit = resize(digit, dw, dh, sw, sh).map((v) => Math.min(Math.max(v, 0), 255));
      dw = sw;
      dh = sh;
    }
    let mass = 0; let my = 0; let mx = 0;
    for (let y = 0; y < dh; y += 1) {
      for (let x = 0; x < dw; x += 1) { const v = digit[y * dw + x]; mass += v; my += v * y; mx += v * x; }
    }
    const oy = Math.min(Math.max(roundHalfEven(CENTRE - my / mass), 0), FIELD - dh);
    const ox = Math.min(Math.max(roundHalfEven(CENTRE - mx / mass), 0), FIELD - dw);
    const out = new Float32Array(FIELD * FIELD);
    for (let y = 0; y < dh; y += 1) out.set(digit.subarray(y * dw, (y + 1) * dw), (oy + y) * FIELD + ox);
    return out;
  }

  function normalize(pixels, mean, std) { // normalize_pixels(): (x / 255 - mean) / std in float32
    return pixels.map((v) => f(f(f(v / 255) - f(mean)) / f(std)));
  }

  window.MnistImage = { mnistImage, normalize };
})();
