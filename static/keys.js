// The key of a keydown as pages.key_map names keys, shared by the labeling and review pages:
// Shift with a top-row digit is "shift+D" on any layout, unless the shifted character is itself a class key.
window.annotatorKeyOf = function (event, keys) {
  if (event.shiftKey && /^Digit[0-9]$/.test(event.code)) {
    const plain = event.key.length === 1 ? event.key.toLowerCase() : "";
    if (plain && keys.includes(plain)) return plain;
    return "shift+" + event.code.slice(5);
  }
  return event.key.length === 1 ? event.key.toLowerCase() : event.key;
};
